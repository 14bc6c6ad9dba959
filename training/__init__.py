"""Training, attacks, evaluation and calibration of robust multi-exit networks."""
