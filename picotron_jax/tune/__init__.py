"""Auto-tuning: the fastest parallel layout that fits (`tune layout`) and hyperparameters with Optuna
(`tune hparams`). A feature on top of the library API; nothing below imports it."""
