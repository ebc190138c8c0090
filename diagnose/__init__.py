"""Why does a critic's d_acc differ between training and another dataset? A client of the engine, like `sweeper`.

  diagnosis.py    the story: load the checkpoint, score every set with the engine, measure, judge
  stats.py        measurements: pure functions of per-pair scores, token ids and training curves
  verdicts.py     each proposed cause judged from the measurements, with its thresholds
  report.py       report.md, figures/ and diagnosis.json
  checkpoints.py  critics saved as MLflow artifacts of a sweep's trials
"""
