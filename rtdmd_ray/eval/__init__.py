"""Evaluation after training: ``rtdmd-ray eval`` over Ray eval workers (``evaluate``), its HTML report
(``report``), training-curve plots (``plots``) and the ShapeWorld results table (``shapes``).

Layer 6: may import ``roles`` and everything below; never a driver or the CLI.
"""
