"""Every command the documentation shows runs as written.

Commands are read from README.md, docs/*.md, launch/README.md and the
docstrings of configs/*.py: every line of a shell code block (untagged, bash,
sh, shell or console; a trailing backslash continues a line) and every inline
code span that runs an md4 program with arguments (`python -m md4...`,
`python benchmarks/...`, `benchmarks/...`, `launch/...`, `md4-...`).

md4's commands run through bash exactly as written, in a checkout-shaped
folder, with three changes only: the placeholders in capitals are replaced by
things made here (DIR: a workdir, FILE: a text file, CORPUS: a corpus), the
overrides of OVERRIDES are appended (a tiny model, two steps, local data), and
the environment is a sandbox (`python` is this interpreter, HOME is temporary,
gcloud is tests/test_launch.py's fake, tfds serves mock data to image
configs). DIR in an `md4.main` command is a fresh workdir; anywhere else it is
the workdir that README's training command trained first.

Other tools' commands are never run; each must start with a tool of EXTERNAL,
so that a renamed md4 command cannot pass as one. Install commands (`pip
install`) are tests/test_install.py's; README.md must hold exactly two.
"""

import ast
import dataclasses
import functools
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4 import data as data_lib
from md4 import defaults
from md4.data import alphabet
from tests import test_gpt2_tokens
from tests.test_launch import FAKE_GCLOUD, _write_exe

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKDOWN = ("README.md", "docs/*.md", "launch/README.md")
CONFIG_DOCSTRINGS = "configs/*.py"
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
EXTERNAL = ("cd", "gcloud", "git", "pip", "sbatch", "srun", "tensorboard", "uv", "venv")

TINY_MODEL = ("--config.model.width=32", "--config.model.num_layers=1",
              "--config.model.num_heads=2", "--config.model.dtype=float32",
              "--config.model.unet_channels=32", "--config.model.unet_num_res_blocks=1",
              "--config.seq_len=32", "--config.batch_size=8")
# Token corpora: CORPUS is one document per line; GPT-2's tokenizer is a small local one.
LOCAL_DATA = ("--config.data_dir={data_dir}", "--config.text8.download=False",
              "--config.tokens.vocab_size=40", "--config.tokens.validation_fraction=0.1",
              "--config.tokens.path={corpus}", "--config.tokens.documents=line",
              "--config.tokens.validation_documents=0",
              "--config.tokens.tiktoken_dir={tiktoken_dir}",
              # Images from mocked tfds: tests/test_image_archives.py prepares the archives.
              "--config.cifar10.source=tfds", "--config.imagenet64.source=tfds")
# Appended to each md4 program's documented command; a program not listed here fails the test.
OVERRIDES = {
    "md4.main": TINY_MODEL + LOCAL_DATA + (
        "--config.num_train_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=2", "--config.num_eval_steps=1", "--config.eval_num_t=1",
        "--config.checkpoint_every_steps=2", "--config.sample_every_steps=2",
        "--config.sample_steps=4", "--config.num_samples=2"),
    "md4.data.prepare": LOCAL_DATA + ("--config.seq_len=32",),
    "md4.compile": TINY_MODEL + ("--config.num_samples=2", "--config.sample_steps=4"),
    "md4.evaluate": ("--num_t=1", "--num_eval_batches=2", "--steps=4", "--num_samples=2"),
    "benchmarks/train_step.py": TINY_MODEL + ("--steps=2", "--rounds=1"),
    "benchmarks/sampling.py": TINY_MODEL + ("--steps=4", "--num_samples=2"),
    "benchmarks/sampling_quality.py": TINY_MODEL + (
        "--config.num_train_steps=2", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.sample_every_steps=2",
        "--config.num_quality_samples=8", "--steps=4", "--num_samples=8"),
    "launch/tpu_pod.sh": (),
    "launch/gpu_slurm.sh": (),
}
PLACEHOLDERS = ("DIR", "FILE", "CORPUS")
# A word in capitals that is not an environment variable ($PWD) or part of a name.
_PLACEHOLDER = re.compile(r"(?<![\w$.{/-])[A-Z][A-Z0-9_]*[A-Z](?![\w])")
_FENCE = re.compile(r"^([ \t]*)```([\w-]*)[^\n]*\n(.*?)^\1```", re.M | re.S)
_SPAN = re.compile(r"`([^`]+)`")
_REFERENCE = re.compile(r"(?<![`\w/])(md4|tests)/[\w/]+\.py: [A-Za-z_][\w.]*")
_PYTHON_NAME = re.compile(r"python[\d.]*")
_INLINE_COMMAND = re.compile(r"(\S*/)?python[\d.]*( -\w)* (-m md4[\w.]*|benchmarks/\S+) \S"
                             r"|(benchmarks|launch)/\S+ \S|md4-\S+ \S")


@dataclasses.dataclass(frozen=True)
class Command:
  """One documented command line, continuation lines joined."""

  text: str
  where: str  # file:line

  @property
  def line(self) -> str:
    """The text without a trailing comment."""
    quote = None
    for index, char in enumerate(self.text):
      if quote:
        quote = None if char == quote else quote
      elif char in "'\"":
        quote = char
      elif char == "#" and (index == 0 or self.text[index - 1].isspace()):
        return self.text[:index].rstrip()
    return self.text

  def segments(self) -> list[list[str]]:
    """The simple commands of the line, as words."""
    segments = [[]]
    for word in shlex.split(self.line):
      if word in ("&&", "||", ";", "|"):
        segments.append([])
      else:
        segments[-1].append(word)
    return [segment for segment in segments if segment]


def _shell_block(block: str, name: str, first_line: int) -> list[Command]:
  commands, pending, start = [], "", None
  for number, line in enumerate(block.splitlines(), first_line):
    line = line.strip()
    if not pending and (not line or line.startswith("#")):
      continue
    start = start or number
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    commands.append(Command(pending + line, f"{name}:{start}"))
    pending, start = "", None
  return commands


def _code_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, dedented text) of every fenced code block of a markdown file."""
  return [(match.group(2), textwrap.dedent(match.group(3)))
          for match in _FENCE.finditer(path.read_text())]


def markdown_parts(text: str, name: str, first_line: int = 1) -> tuple[list[Command], list[str]]:
  """(commands, every inline code span outside code blocks) of markdown text."""
  commands = []

  def take_block(match: re.Match) -> str:
    if match.group(2) in SHELL_BLOCKS:
      start = first_line + text.count("\n", 0, match.start(3))
      commands.extend(_shell_block(textwrap.dedent(match.group(3)), name, start))
    return "\n" * match.group(0).count("\n")  # Keeps the line numbers of what follows.

  prose = _FENCE.sub(take_block, text)
  spans = []
  for match in _SPAN.finditer(prose):
    span = " ".join(match.group(1).split())
    spans.append(span)
    if _INLINE_COMMAND.match(span):
      commands.append(Command(span, f"{name}:{first_line + prose.count(chr(10), 0, match.start())}"))
  return commands, spans


def documents() -> dict[str, tuple[str, int]]:
  """Documentation text by file (relative name): (markdown text, its first line in the file)."""
  found = {}
  for pattern in MARKDOWN:
    for path in sorted(REPO.glob(pattern)):
      found[str(path.relative_to(REPO))] = (path.read_text(), 1)
  for path in sorted(REPO.glob(CONFIG_DOCSTRINGS)):
    module = ast.parse(path.read_text())
    docstring = ast.get_docstring(module, clean=False) or ""
    found[str(path.relative_to(REPO))] = (docstring, module.body[0].lineno if docstring else 1)
  return found


def documented_commands() -> list[Command]:
  return [command for name, (text, first_line) in documents().items()
          for command in markdown_parts(text, name, first_line)[0]]


def installs(command: Command) -> bool:
  """Whether the line runs `pip install` (tests/test_install.py runs those)."""
  words = shlex.split(command.line)
  return any(os.path.basename(word) == "pip" and following == "install"
             for word, following in zip(words, words[1:]))


def program(words: list[str]) -> str:
  """What a simple command runs: an md4 program (a module such as "md4.main", or
  a script path) or an external tool of EXTERNAL; ValueError if neither."""
  while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value prefixes.
    words = words[1:]
  first = words[0]
  name = os.path.basename(first)
  if _PYTHON_NAME.fullmatch(name):
    arguments = [word for word in words[1:] if word not in ("-u", "-B")]
    if arguments[:1] == ["-m"] and len(arguments) > 1:
      if arguments[1] == "venv" or arguments[1].split(".")[0] == "md4":
        return arguments[1]
    elif arguments and arguments[0].startswith("benchmarks/"):
      return arguments[0]
    raise ValueError(f"{shlex.join(words)!r}: a Python command that runs no md4 module or "
                     "benchmark script")
  if first.startswith(("benchmarks/", "launch/")):
    return first
  if name.startswith("md4-"):
    entry_points = importlib.metadata.entry_points(group="console_scripts", name=name)
    if not entry_points:
      raise ValueError(f"{name!r} is no installed console script of md4")
    return next(iter(entry_points)).module
  if name in EXTERNAL:
    return name
  raise ValueError(f"{first!r} is neither an md4 program nor an external tool of "
                   f"{EXTERNAL}")


def md4_program(command: Command) -> str | None:
  """The md4 program the command runs, None for other tools; ValueError for what is unknown."""
  if installs(command):
    return None
  programs = [program(segment) for segment in command.segments()]
  own = [name for name in programs if name not in EXTERNAL]
  if len(own) > 1:
    raise ValueError(f"runs {len(own)} md4 programs; show one per line")
  if not own:
    return None
  if own[0] not in OVERRIDES:
    raise ValueError(f"{own[0]!r} has no shortening in OVERRIDES")
  unknown = set(_PLACEHOLDER.findall(command.line)) - set(PLACEHOLDERS)
  if unknown:
    raise ValueError(f"unknown placeholders {sorted(unknown)}; known: {PLACEHOLDERS}")
  return own[0]


def _classify(commands: list[Command]) -> tuple[dict[Command, str], list[str]]:
  """({md4 command: its program}, the problems found), never raising."""
  own, problems = {}, []
  for command in commands:
    try:
      name = md4_program(command)
    except ValueError as error:
      problems.append(f"{command.where}: {command.text!r}: {error}")
      continue
    if name is not None:
      own[command] = name
  return own, problems


COMMANDS = documented_commands()
MD4_COMMANDS, PROBLEMS = _classify(COMMANDS)
TRAINING = next((command for command, name in MD4_COMMANDS.items()
                 if command.where.startswith("README.md:") and name == "md4.main"
                 and "--workdir=DIR" in command.line), None)
USES_TRAINED_DIR = [command for command, name in MD4_COMMANDS.items()
                    if name != "md4.main" and "DIR" in _PLACEHOLDER.findall(command.line)]


def _standalone() -> list[Command]:
  """The md4 commands that need no trained workdir, each text once (where it is first shown)."""
  first = {}
  for command in MD4_COMMANDS:
    if command != TRAINING and command not in USES_TRAINED_DIR:
      first.setdefault(command.text, command)
  return list(first.values())


STANDALONE = _standalone()


# ------------------------------------------------------------------ the sandbox

# `python` on PATH: this interpreter, or, with MD4_TEST_MOCK_TFDS set, the launcher below.
PYTHON_ON_PATH = """#!/bin/sh
if [ -n "$MD4_TEST_MOCK_TFDS" ]; then exec {python} {launcher} "$@"; fi
exec {python} "$@"
"""

# Runs `python -m MODULE ARGS` or `python SCRIPT ARGS` with tfds serving random examples.
MOCK_TFDS_LAUNCHER = """
import os, runpy, sys
import tensorflow_datasets as tfds
sys.path.insert(0, os.getcwd())
with tfds.testing.mock_data(num_examples=16):
  if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
  else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Tests never submit, allocate or run cluster jobs.
REFUSE = "#!/bin/sh\necho \"$(basename \"$0\"): not available in the documentation tests\" >&2\nexit 1\n"

_WORDS = ("the king sat on his throne and the queen ran far away from home when rain fell over "
          "quick brown fox jumps lazy river stone tree under light dark night day sun moon").split()


@dataclasses.dataclass
class Workspace:
  """A checkout-shaped folder, local data and the environment the commands run in."""

  root: pathlib.Path
  checkout: pathlib.Path
  data_dir: pathlib.Path
  values: dict[str, str]
  env: dict[str, str]
  gcloud_log: pathlib.Path


def _words(rng: np.random.Generator, count: int) -> str:
  return " ".join(rng.choice(_WORDS, size=count))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
  root = tmp_path_factory.mktemp("documented")
  checkout = root / "checkout"
  checkout.mkdir()
  for name in ("md4", "configs", "benchmarks", "launch", "pyproject.toml", "README.md"):
    (checkout / name).symlink_to(REPO / name)
  bin_dir = root / "bin"
  bin_dir.mkdir()
  (root / "launcher.py").write_text(MOCK_TFDS_LAUNCHER)
  python = PYTHON_ON_PATH.format(python=shlex.quote(sys.executable),
                         launcher=shlex.quote(str(root / "launcher.py")))
  for name in ("python", "python3"):
    _write_exe(bin_dir / name, python)
  (checkout / ".venv" / "bin").mkdir(parents=True)
  (checkout / ".venv" / "bin" / "python").symlink_to(bin_dir / "python")
  _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
  for name in ("sbatch", "salloc", "srun", "scontrol"):
    _write_exe(bin_dir / name, REFUSE)

  home = root / "home"
  data_dir = home / ".cache" / "md4"
  (data_dir / "text8").mkdir(parents=True)
  rng = np.random.default_rng(0)
  with zipfile.ZipFile(data_dir / "text8" / "text8.zip", "w") as archive:
    archive.writestr("text8", alphabet.decode(rng.integers(0, alphabet.VOCAB_SIZE, 20_000)))
  text_file = root / "text.txt"
  text_file.write_text(_words(rng, 2400) + "\n")
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(_words(rng, rng.integers(3, 30)) for _ in range(400)) + "\n")
  test_gpt2_tokens.save_gpt2_files(test_gpt2_tokens.train_bpe(300), root / "gpt2")

  gcloud_log = root / "gcloud.log"
  env = {key: value for key, value in os.environ.items()
         if not key.startswith(("SLURM_", "MD4_", "CUDA_VISIBLE", "JAX_LOCAL", "TFDS_"))
         and key != "XLA_FLAGS"}
  env.update(HOME=str(home), USER="tester", TIKTOKEN_CACHE_DIR=str(root / "tiktoken_cache"), JAX_PLATFORMS="cpu", GCLOUD_LOG=str(gcloud_log),
             PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}")
  return Workspace(root, checkout, data_dir, {"FILE": str(text_file), "CORPUS": str(corpus)},
                   env, gcloud_log)


@functools.cache
def _reads_tfds(config_file: str, dataset: str | None) -> bool:
  """Whether the config (with config.dataset overridden, if given) reads an image source.

  Image sources read mocked tfds data here (LOCAL_DATA sets their source option).
  """
  spec = importlib.util.spec_from_file_location("documented_config", REPO / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  name = dataset or module.get_config().dataset
  return "tfds_name" in data_lib.get(name).options


def _environment(command: Command, workspace: Workspace) -> dict[str, str]:
  flags = dict(word.split("=", 1) for word in shlex.split(command.line) if "=" in word)
  env = dict(workspace.env)
  if "--config" in flags and _reads_tfds(flags["--config"], flags.get("--config.dataset")):
    env["MD4_TEST_MOCK_TFDS"] = "1"
  return env


def run(command: Command, workspace: Workspace,
        workdir: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """Runs an md4 command as written, placeholders replaced and its OVERRIDES appended.

  DIR is `workdir`, or for md4.main a fresh workdir named after the command.
  """
  name = md4_program(command)
  if workdir is None and name == "md4.main":
    workdir = workspace.root / "runs" / re.sub(r"\W", "_", command.where)
  values = dict(workspace.values, **({} if workdir is None else {"DIR": str(workdir)}))
  line = _PLACEHOLDER.sub(lambda match: shlex.quote(values[match.group()]), command.line)
  overrides = [override.format(data_dir=workspace.data_dir, corpus=workspace.values["CORPUS"],
                               tiktoken_dir=workspace.root / "gpt2" / "openai")
               for override in OVERRIDES[name]]
  return subprocess.run(["bash", "-c", " ".join([line, *map(shlex.quote, overrides)])],
                        cwd=workspace.checkout, env=_environment(command, workspace),
                        capture_output=True, text=True, timeout=600)


def _check(result: subprocess.CompletedProcess, command: Command) -> None:
  assert result.returncode == 0, (
      f"{command.where}: {command.text}\nexit {result.returncode}\n{result.stdout[-2000:]}\n"
      f"{result.stderr[-4000:]}")


# ------------------------------------------------------------------ the tests


def test_every_command_is_known():
  assert not PROBLEMS, "\n".join(PROBLEMS)
  readme = [command for command in COMMANDS if command.where.startswith("README.md:")]
  install_commands = [command.where for command in readme if installs(command)]
  assert len(install_commands) == 2, install_commands
  assert TRAINING is not None, "README.md shows no `python -m md4.main ... --workdir=DIR`"
  sources = {command.where.split(":")[0] for command in MD4_COMMANDS}
  assert {"README.md", "launch/README.md", "configs/owt.py"} <= sources, sources


@pytest.mark.parametrize("text, error", [
    ("python -m md5.main --config=configs/text8.py", "runs no md4 module"),
    ("md4train --config=configs/text8.py", "neither an md4 program nor an external tool"),
    ("python -m md4.evaluate --workdir=WORKDIR", "unknown placeholders"),
    ("python benchmarks/new.py --config=configs/text8.py", "no shortening"),
])
def test_unknown_programs_and_placeholders_are_refused(text, error):
  with pytest.raises(ValueError, match=error):
    md4_program(Command(text, "test"))


def test_training_then_every_command_on_its_workdir(workspace):
  workdir = workspace.root / "trained"
  _check(run(TRAINING, workspace, workdir), TRAINING)
  assert (workdir / "checkpoints").is_dir()
  for command in USES_TRAINED_DIR:
    _check(run(command, workspace, workdir), command)


@pytest.mark.parametrize("command", STANDALONE, ids=lambda command: command.where)
def test_command_runs(command, workspace):
  if MD4_COMMANDS[command] == "md4.compile":
    pytest.importorskip("libtpu", reason="md4-compile needs md4's tpu extra")
  calls_before = workspace.gcloud_log.read_text() if workspace.gcloud_log.exists() else ""
  _check(run(command, workspace), command)
  if MD4_COMMANDS[command] == "launch/tpu_pod.sh" and "--dry-run" not in command.line:
    calls = workspace.gcloud_log.read_text()[len(calls_before):]
    assert '"ssh"' in calls, "the launch reached the fake gcloud's ssh"


def test_a_command_that_drifts_from_the_code_fails(workspace):
  documented = next(command for command in MD4_COMMANDS
                    if "--config.tokens.path=" in command.line)
  broken = Command(documented.text.replace("--config.tokens.path=", "--config.tokens.pathh="),
                   documented.where)
  result = run(broken, workspace)
  assert result.returncode != 0 and "pathh" in result.stderr, result.stderr[-2000:]


def _config_key_exists(config, key: str) -> bool:
  for part in key.split("."):
    if not hasattr(config, "keys") or part not in config:
      return False
    config = config[part]
  return True


def test_named_programs_modules_files_and_config_keys_exist():
  """Prose names things too: `python -m md4.x`, `launch/x.sh`, `md4/x.py: name`, `--config.x`."""
  config = defaults.get_config()
  missing = []
  for name, (text, _) in documents().items():
    # Spans, and references to functions written outside spans (in formulas).
    bare = [match.group().rstrip(".") for match in _REFERENCE.finditer(text)]
    for span in markdown_parts(text, name)[1] + bare:
      words = span.split()
      if match := re.fullmatch(r"(?:\S*/)?python[\d.]* -m (md4[\w.]*)", span):
        found = importlib.util.find_spec(match.group(1)) is not None
      elif re.fullmatch(r"(benchmarks|configs|docs|launch|md4|tests)/\S*", words[0]):
        path, attribute = words[0], ""
        if re.fullmatch(r"\S+\.py: [\w.]+", span):
          path, attribute = span.split(": ")
        found = bool(glob.glob(str(REPO / path)))
        if found and attribute:
          module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
          found = _resolves(importlib.import_module(module), attribute)
      elif match := re.fullmatch(r"(?:--)?config\.([a-z_][\w.]*?)(=\S*)?", span):
        found = span == "config.json" or _config_key_exists(config, match.group(1))
      else:
        continue
      if not found:
        missing.append(f"{name}: `{span}`")
  assert not missing, "\n".join(missing)


def _resolves(module, attribute: str) -> bool:
  value = module
  for part in attribute.split("."):
    if not hasattr(value, part):
      return False
    value = getattr(value, part)
  return True


def test_every_module_is_in_the_layout():
  layout = (REPO / "docs" / "architecture.md").read_text()
  modules = [path for path in sorted(REPO.glob("md4/**/*.py"))
             if path.name != "__init__.py" or path.read_text().count("\n") > 1]
  missing = [str(path.relative_to(REPO)) for path in modules
             if not re.search(rf"^ *{re.escape(path.name)} ", layout, re.M)]
  assert not missing, f"docs/architecture.md's module layout lacks {missing}"


def test_config_keys_reference_is_current():
  assert (REPO / "docs" / "config.md").read_text().endswith("\n\n" + defaults.keys_reference()), (
      "docs/config.md is out of date: paste md4.defaults.keys_reference()'s output into it")


def test_every_doc_is_listed_in_readme():
  readme = (REPO / "README.md").read_text()
  missing = [path.name for path in sorted((REPO / "docs").glob("*.md"))
             if f"`docs/{path.name}`" not in readme]
  assert not missing, f"README.md's Documentation list lacks {missing}"


def _run_architecture_example(marker: str) -> dict:
  """Runs the one Python block of docs/architecture.md holding marker; its namespace."""
  (example,) = [block for language, block in _code_blocks(REPO / "docs" / "architecture.md")
                if language == "python" and marker in block]
  namespace = {}
  exec(compile(example, "docs/architecture.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_the_documented_data_source_example_works():
  name = _run_architecture_example("data_lib.register")["SOURCE"].name
  try:
    config = defaults.get_config()
    config.update(dataset=name, seq_len=8, batch_size=4)
    config[name].modulus = 7
    dataset = data_lib.create(defaults.validate(config))
    batch = next(dataset.train)["x"]
    assert batch.shape == (4, 8) and 0 <= batch.min() and batch.max() < 7
    assert len(list(dataset.eval_batches())) == 4
  finally:
    data_lib.unregister(name)


def test_the_documented_sampler_example_works():
  """The sampler example registers a sampler that configs, every model type and
  md4.evaluate's flag then offer."""
  from md4 import models, samplers  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  name = _run_architecture_example("samplers.register")["SAMPLER"].name
  try:
    for model_type in models.MODEL_TYPES:
      config = tiny_config(model_type=model_type, sampler=name)
      assert defaults.validate(config).sampler_options[name].time == 1.0
      model = models.create(config, 27, (config.seq_len,))
      assert name in model.supports and model.network_calls(name, 64) == 1
      params = nn.meta.unbox(model.init(jax.random.PRNGKey(0)))
      drawn = model.sample(params, jax.random.PRNGKey(1), 2, steps=4, grid="cosine",
                           sampler=name, prefix=jnp.full((2, 3), 5, jnp.int32), time=0.5)
      tokens = np.asarray(drawn.tokens)
      assert int(drawn.nfe) == 1 and tokens.min() >= 0 and tokens.max() < 27
      assert np.all(tokens[:, :3] == 5), model_type
    assert models.configured_sampler(config, name, {"time": 0.5}) == (name, {"time": 0.5})
  finally:
    samplers.unregister(name)


def test_the_documented_model_type_example_works():
  """The model-type example validates, trains a step and samples with what its space offers."""
  from md4 import models, trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from md4.runtime import sharding  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  namespace = _run_architecture_example("MODEL_TYPES")
  name = next(key for key, value in models.MODEL_TYPES.items()
              if value is namespace["EagerMD4"])
  try:
    config = defaults.validate(tiny_config(model_type=name))
    model_class = models.get(name)
    assert "ancestral" in model_class.sampler_names()
    assert "remdm" not in model_class.sampler_names()
    with pytest.raises(ValueError, match="remdm"):
      defaults.validate(tiny_config(model_type=name, sampler="remdm"))
    dataset, trainer = trainer_lib.build(config)
    state = trainer.init(jax.random.PRNGKey(0))
    batch = sharding.global_batch(next(dataset.train), trainer.batch_sharding)
    state, metrics = trainer.train_step(state, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(metrics["loss"]))
    drawn = trainer.model.sample(state.ema_params, jax.random.PRNGKey(2), 2, steps=4,
                                 grid="cosine")
    assert int(drawn.nfe) == 4 and int(np.asarray(drawn.tokens).max()) < dataset.vocab_size
  finally:
    del models.MODEL_TYPES[name]
