"""Self-supervised pretraining: DINO self-distillation + iBOT masked-token distillation in 3D.

One module per job, in the shape of DINOv2's ``dinov2/loss`` and ``dinov2/train``:
  config.py     SSLConfig (dataclasses; YAML/JSON in, resolved JSON out)
  augment.py    global/local 3D crops with CT-appropriate augmentation, seeded per sample
  masking.py    block-wise patch masks for masked image modeling
  heads.py      DINOHead (MLP -> bottleneck -> weight-normed prototypes), pixel decoder for MAE
  losses.py     DINO CLS loss, iBOT patch loss, centering / Sinkhorn-Knopp, reconstruction loss
  ema.py        EMA teacher update and the momentum / temperature schedules
  meta_arch.py  student + teacher + heads + losses: one forward per step returns the losses
Everything here is torch; nothing knows about files, processes or Slicer.
"""
