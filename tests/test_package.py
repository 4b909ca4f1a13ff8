"""The library stands apart from the training recipes: ``import slcompile`` and a transform pull in
only torch, sympy and numpy (triton and torchao where their features are used), never the recipes'
dependencies."""
import json
import subprocess
import sys

RECIPE_ONLY = ("tokenizers", "tqdm", "safetensors", "torchao", "transformers", "matplotlib", "slcompile.recipes")

SCRIPT = """
import json, sys
import torch
before = set(sys.modules)
import slcompile
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
slcompile.transform(model, slcompile.SLConfig(rank=2, targets=("0", "2")))
model(torch.randn(3, 16)).sum().backward()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_import_and_transform_load_no_recipe_dependency():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    offending = [m for m in loaded if any(m == name or m.startswith(name + ".") for name in RECIPE_ONLY)]
    assert offending == [], f"import slcompile loaded {offending}"
    assert "slcompile.layers" in loaded  # the probe saw the library's own imports


def test_train_cli_keeps_its_documented_name():
    out = subprocess.run([sys.executable, "-m", "slcompile.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--method" in out.stdout
