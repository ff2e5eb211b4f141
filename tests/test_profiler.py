"""config.profile_steps: a jax.profiler trace of exactly those training steps."""

import gzip
import json
import re

import pytest

from md4 import defaults
from md4 import train
from tests.test_train import tiny_config


def traced_steps(workdir) -> list[int]:
  """The step numbers of the "train" step annotations in workdir's traces."""
  steps = []
  for path in (workdir / "profile" / "plugins" / "profile").glob("*/*.trace.json.gz"):
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    steps += [int(event["args"]["step_num"]) for event in events
              if event.get("name") == "train" and "args" in event]
  return sorted(steps)


def test_the_named_steps_are_traced_for_tensorboard_and_perfetto(tmp_path):
  train.train_and_evaluate(tiny_config(profile_steps=(2, 3)), tmp_path)
  assert traced_steps(tmp_path) == [2, 3]
  [run] = (tmp_path / "profile" / "plugins" / "profile").iterdir()
  assert list(run.glob("*.xplane.pb")) and (run / "perfetto_trace.json.gz").exists()


def test_no_trace_by_default(tmp_path):
  train.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2,
                                       sample_every_steps=2), tmp_path)
  assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("steps", [(3,), (0, 2), (5, 4), (1.0, 2)])
def test_a_bad_range_is_refused_naming_the_key(steps):
  with pytest.raises(ValueError, match=re.escape(f"config.profile_steps must be () or "
                                                 f"(first, last) with 1 <= first <= last, "
                                                 f"got {steps}")):
    defaults.validate(tiny_config(profile_steps=steps))
