"""Class-conditional MD4 on ImageNet 64x64 with classifier-free guidance.

imagenet64.py plus label conditioning on the 1000 classes: labels dropped to
the null class 10% of the time in training, guidance scale 2 when sampling.
"""

from md4.configs import imagenet64


def get_config():
  config = imagenet64.get_config()
  config.class_conditional = True
  config.label_dropout = 0.1
  config.guidance_scale = 2.0
  return config
