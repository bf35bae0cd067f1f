"""moescale: does a value network get better with more parameters, and how?"""

__version__ = "0.1.0"
