"""No name of ours shadows a distribution: every top-level module and package the project puts on sys.path (the
checkout's root, and tests/ under pytest) or installs into site-packages is checked against the distributions of
the running environment. This is the check that would have caught our old `kernels/` package hiding Hugging
Face's `kernels`, which transformers imports at start-up (docs/architecture.md "Names")."""
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT

OUR_DISTRIBUTION = "dsa-lab"


def importable_names(folder) -> set[str]:
    """Top-level names `import NAME` finds in `folder`: modules (*.py) and regular packages (with __init__.py).
    A folder without __init__.py is at most a namespace portion, which any real package later on sys.path wins
    over, so it shadows nothing."""
    modules = {path.stem for path in folder.glob("*.py")}
    packages = {path.parent.name for path in folder.glob("*/__init__.py")}
    return modules | packages


def wheel_names(tmp_path) -> set[str]:
    """Top-level names inside the wheel `pip install .` would install, built from the tracked files."""
    source = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    entries = zipfile.ZipFile(wheel).namelist()
    return {entry.split("/")[0].removesuffix(".py") for entry in entries if ".dist-info/" not in entry}


def collisions(names: set[str], distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    """{our name: the other distributions that provide it}."""
    found = {name: sorted(set(distributions.get(name, ())) - {OUR_DISTRIBUTION}) for name in names}
    return {name: others for name, others in found.items() if others}


def test_the_detector_names_both_sides_of_a_collision():
    """The check itself: a planted `kernels` beside Hugging Face's distribution of that name is caught."""
    assert collisions({"kernels", "models"}, {"kernels": ["kernels"], "torch": ["torch"]}) == {"kernels": ["kernels"]}
    assert collisions({"dsa_lab"}, {"dsa_lab": [OUR_DISTRIBUTION]}) == {}


def test_no_name_on_sys_path_or_installed_shadows_a_distribution(tmp_path):
    ours = {"checkout root": importable_names(ROOT), "tests/": importable_names(ROOT / "tests"),
            "pip install .": wheel_names(tmp_path)}
    distributions = importlib.metadata.packages_distributions()
    found = [f"{name} ({where}) is also provided by {', '.join(others)}"
             for where, names in ours.items() for name, others in sorted(collisions(names, distributions).items())]
    assert not found, "rename these (or move them under dsa_lab/):\n" + "\n".join(found)
    assert "dsa_lab" in ours["checkout root"] and "kernels" not in ours["checkout root"]


def test_transformers_imports_and_builds_a_model_with_the_checkout_first_on_sys_path():
    """As a user runs the lab: the checkout is sys.path[0] (`python -c` in its root), and transformers' start-up
    imports (activations, hub kernels) and a tiny Llama still work."""
    script = ("import sys; assert sys.path[0] == ''\n"
              "import transformers.activations\n"
              "import torch\n"
              "from transformers import LlamaConfig, LlamaForCausalLM\n"
              "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
              "                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)\n"
              "logits = LlamaForCausalLM(cfg)(torch.randint(0, 64, (1, 8))).logits\n"
              "assert logits.shape == (1, 8, 64)\n"
              "import sparse_attention, models, config\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
