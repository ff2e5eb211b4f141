"""md4.runtime.orbax_quiet: what it silences, that it puts every hook back, and that
Orbax still words a failed array read the way it matches."""

import logging as python_logging
import sys
import types

from absl import logging
import orbax.checkpoint as ocp
import pytest

from md4 import train
from md4 import trainer as trainer_lib
from md4.runtime import checkpointing
from md4.runtime import orbax_quiet
from tests.test_reliability import damage
from tests.test_train import tiny_config


def test_quiet_silences_abandoned_reads_only_and_puts_every_hook_back():
  unraisablehook, level = sys.unraisablehook, logging.get_absl_logger().level
  asyncio_filters = list(python_logging.getLogger("asyncio").filters)
  passed = []
  sys.unraisablehook = passed.append
  try:
    with orbax_quiet.quiet() as silenced:
      abandoned = RuntimeError("Event loop is closed")
      other = ValueError("a real problem")
      for error in (abandoned, other):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=None))
      assert logging.get_absl_logger().level > logging.FATAL
    assert silenced == [abandoned] and [u.exc_value for u in passed] == [other]
    assert sys.unraisablehook == passed.append  # Not replaced beyond the block.
  finally:
    sys.unraisablehook = unraisablehook
  assert logging.get_absl_logger().level == level
  assert python_logging.getLogger("asyncio").filters == asyncio_filters


def test_orbax_still_words_a_failed_read_as_matched(tmp_path):
  """The restore of a cut-short checkpoint fails with the read error quiet() matches;
  when Orbax words it otherwise, the workaround matches nothing and this fails."""
  config = tiny_config(num_train_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, tmp_path)
  damage(tmp_path / "checkpoints/2")
  _, trainer = trainer_lib.build(config)
  checkpoints = checkpointing.manager(config, tmp_path)
  abstract = checkpointing.abstract_state(trainer.init, trainer.state_sharding)
  with orbax_quiet.quiet(), pytest.raises(Exception) as raised:
    checkpoints.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  checkpoints.close()
  causes = [raised.value, raised.value.__cause__, raised.value.__context__]
  assert any(orbax_quiet.is_abandoned_read(cause) for cause in causes), raised.value
