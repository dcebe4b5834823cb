"""The model lifecycle, off the hot path: training, the supervised challenger, retraining and
its promotion rule, backtests and detection metrics, drift. Each step is separate and
recorded; the scorer only ever serves what the registry names."""
