"""Imports only point down: every project module sits in a declared layer and imports nothing above it
(function-level imports included), there is no import cycle, no module imports a runner script, no
experiment imports another experiment, and packages' __init__ files import nothing."""
import ast
import tomllib

from conftest import ROOT

# Layer order, bottom first (docs/architecture.md "Layers"). A module may import modules of its own or a lower
# layer. Dotted names are modules inside the packages; plain names are the top-level modules users import.
LAYERS = [
    ("plumbing", ["config", "dsa_lab.common.rope", "dsa_lab.common.distributed", "dsa_lab.common.results_io", "dsa_lab.common.variants",
                  "dsa_lab.common.plateau", "dsa_lab.common.work_sizes", "dsa_lab.common.timing"]),
    ("reference", ["sparse_attention"]),
    ("fast paths", ["dsa_lab.kernels.chunked", "dsa_lab.kernels.chunked_mqa", "dsa_lab.kernels.cpp_build", "dsa_lab.kernels.cpu_sparse",
                    "dsa_lab.kernels.cpu_select", "dsa_lab.kernels.cpu_indexer_row", "dsa_lab.kernels.triton_mha",
                    "dsa_lab.kernels.triton_mqa"]),
    ("backends", ["dsa_lab.kernels.backends"]),
    ("variants", ["quantization_utils", "adaptive_selection", "efficient_patterns", "optimized_indexers"]),
    ("models", ["models", "dsa_lab.interop.hf_interop", "dsa_lab.interop.levers", "dsa_lab.interop.retrofit"]),
    ("decoding", ["dsa_lab.inference.decode", "dsa_lab.inference.row_linear", "dsa_lab.inference.retrofit_decode"]),
    ("data and training", ["dsa_lab.training.token_files", "dsa_lab.training.data", "dsa_lab.training.readback",
                           "dsa_lab.training.train"]),
    ("experiment plumbing", ["dsa_lab.experiments.skeleton", "dsa_lab.experiments.reports", "dsa_lab.experiments.plots",
                             "dsa_lab.experiments.mqar", "dsa_lab.experiments.costs", "dsa_lab.experiments.tasks",
                             "dsa_lab.experiments.retrieval", "dsa_lab.experiments.retrofit_speed"]),
    ("experiments", ["dsa_lab.experiments.sparse_vs_classic", "dsa_lab.experiments.long_context", "dsa_lab.experiments.adaptive_sparsity",
                     "dsa_lab.experiments.ablations", "dsa_lab.experiments.hf_warmup", "dsa_lab.experiments.retrofit",
                     "dsa_lab.experiments.lever_table"]),
    ("scripts", ["run_experiment", "run_comprehensive_ablations", "benchmark", "gpu_check", "sample",
                 "visualize_attention"]),
]
LAYER_OF = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
EXPERIMENTS = set(dict(LAYERS)["experiments"])
SUBPACKAGES = ("common", "kernels", "interop", "inference", "training", "experiments")
PACKAGES = ("dsa_lab",) + tuple(f"dsa_lab.{sub}" for sub in SUBPACKAGES)


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources() -> dict[str, str]:
    """{dotted module name: source} of the top-level modules and the packages' modules."""
    folders = [ROOT.joinpath(*pkg.split(".")) for pkg in PACKAGES]
    paths = sorted(ROOT.glob("*.py")) + [p for folder in folders for p in sorted(folder.glob("*.py"))]
    return {module_name(path): path.read_text() for path in paths}


def project_modules() -> dict[str, ast.Module]:
    return {name: ast.parse(text, name) for name, text in project_sources().items()}


def imported_project_modules(tree: ast.Module, project: set[str]) -> set[str]:
    """Every project module named by an import anywhere in the file (module level or inside functions);
    `from pkg import mod` names the module pkg.mod."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & project
            names.update(subs or {node.module})
    return names & project


def is_script(tree: ast.Module) -> bool:
    """Has an `if __name__ == "__main__":` block."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def import_graph() -> dict[str, set[str]]:
    trees = project_modules()
    return {name: imported_project_modules(tree, set(trees)) - {name} for name, tree in trees.items()}


def test_layer_order_is_respected_and_acyclic():
    print("\ndeclared layer order (bottom first):")
    for level, (name, modules) in enumerate(LAYERS, 1):
        print(f"  {level}. {name}: {', '.join(modules)}")
    trees = project_modules()
    graph = import_graph()
    undeclared = sorted(set(trees) - set(LAYER_OF) - set(PACKAGES))
    assert not undeclared, f"modules missing from LAYERS (place them in a layer): {undeclared}"
    upward = [f"{m} (layer {LAYER_OF[m] + 1}) imports {d} (layer {LAYER_OF[d] + 1})"
              for m, deps in graph.items() if m in LAYER_OF for d in sorted(deps) if LAYER_OF[d] > LAYER_OF[m]]
    assert not upward, "upward imports:\n" + "\n".join(upward)
    scripts = {name for name, tree in trees.items() if is_script(tree)}
    into_scripts = [f"{m} imports the script {d}" for m, deps in graph.items() for d in sorted(deps & scripts)]
    assert not into_scripts, "\n".join(into_scripts)
    assert not find_cycle(graph), f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_experiment_imports_another_and_packages_are_only_folders():
    graph = import_graph()
    crossing = [f"{m} imports {d}" for m in EXPERIMENTS for d in sorted(graph.get(m, set()) & EXPERIMENTS)]
    assert not crossing, "experiments importing experiments:\n" + "\n".join(crossing)
    with_imports = [pkg for pkg in PACKAGES if graph.get(pkg)]
    assert not with_imports, f"package __init__ files with imports (keep them empty): {with_imports}"


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path (first module repeated at the end), or [] when there is none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_checks_catch_a_cycle_an_upward_import_and_a_crossing():
    """The detectors themselves: a planted cycle, an upward import and a package-form import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    import models\n    from dsa_lab.kernels import backends\n")
    assert imported_project_modules(tree, {"models", "dsa_lab.kernels", "dsa_lab.kernels.backends"}) == {
        "models", "dsa_lab.kernels.backends"}
    assert LAYER_OF["models"] > LAYER_OF["sparse_attention"]
    assert LAYER_OF["dsa_lab.experiments.skeleton"] < min(LAYER_OF[m] for m in EXPERIMENTS)


def test_docs_name_every_module_and_the_install_carries_no_module():
    """docs/architecture.md names every module of LAYERS; pyproject installs none of them (the checkout is where the
    lab runs from, so `pip install .` puts no generic name such as `config` or `models` into site-packages; the
    installed names themselves are checked against every distribution in tests/test_names.py)."""
    declared = {m for _, modules in LAYERS for m in modules} & set(project_modules())
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    missing = sorted(m for m in declared if f"`{m.replace('.', '/')}.py`" not in architecture)
    assert not missing, f"docs/architecture.md does not name: {missing}"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools.get("packages") == [] and setuptools.get("py-modules") == [], \
        f"pyproject installs modules (run them from the checkout instead): {setuptools}"


MAX_FUNCTION_LINES = 60


def long_functions(tree: ast.Module, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method longer than `limit` lines (docstring and decorators' body included)."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_every_function_is_at_most_60_lines():
    too_long = [f"{module}.{name}: {lines} lines" for module, tree in project_modules().items()
                for name, lines in long_functions(tree)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(too_long)
    planted = ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)  # the detector itself: 61 lines
    assert long_functions(planted) == [("f", MAX_FUNCTION_LINES + 1)]
    assert long_functions(ast.parse("def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))) == []


# Each piece of the experiment skeleton lives in these modules only; a runner that re-implements one is caught here.
SKELETON_OWNERS = {"check_stale(": {"dsa_lab.common.results_io", "dsa_lab.experiments.skeleton"},
                   "checkpointed(": {"dsa_lab.training.train", "dsa_lab.experiments.skeleton"},
                   "discard_checkpoints(": {"dsa_lab.training.train", "dsa_lab.experiments.skeleton"}, "holm(": {"dsa_lab.common.results_io"},
                   "paired_t_pvalue(": {"dsa_lab.common.results_io"}, '"summary.json"': {"dsa_lab.experiments.skeleton", "gpu_check"},  # gpu_check reads a run's summary
                   "* 1000 +": set()}  # stream offsets: data.stream_seed and its named STREAM_* constants


def skeleton_copies(sources: dict[str, str]) -> list[str]:
    """'module: pattern' for every skeleton piece found outside the modules that own it."""
    return [f"{module}: {pattern}" for pattern, owners in SKELETON_OWNERS.items()
            for module, text in sources.items() if pattern in text and module not in owners]


def test_the_experiment_skeleton_exists_once():
    sources = project_sources()
    assert not skeleton_copies(sources), "skeleton pieces re-implemented:\n" + "\n".join(skeleton_copies(sources))
    planted = {"dsa_lab.experiments.long_context": 'atomic_write_json(out / "summary.json", summary)\nseed * 1000 + 2'}
    assert skeleton_copies(planted) == ['dsa_lab.experiments.long_context: "summary.json"',
                                        "dsa_lab.experiments.long_context: * 1000 +"]
