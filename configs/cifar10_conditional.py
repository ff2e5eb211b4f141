"""Class-conditional MD4 on CIFAR-10 with classifier-free guidance.

cifar10.py plus label conditioning: labels are dropped to the null class 10%
of the time in training, and samples (classes 0, 1, ..., 9, 0, ...) mix the
conditional and unconditional logits with guidance scale 2.
"""

from md4.configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.class_conditional = True
  config.label_dropout = 0.1
  config.guidance_scale = 2.0
  return config
