"""The studies: each file holds one study's table declarations (tables.Table), figures and the outcome of
its predictions; presets.py names a study's report. toy.py: the 4-norm study and make reproduce; paper.py:
the toy at the paper schedule; mnist.py: real images; direct.py: the direct statistic's tables that the toy
studies share."""
