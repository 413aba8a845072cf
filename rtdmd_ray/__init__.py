"""rtdmd-ray: AC-DMD cold start and RTDMD reward RL for few-step flow generators, on Ray."""

__version__ = "0.1.0"
