"""Imports only point down: every project module sits in a declared layer and imports nothing above it
(function-level imports included), there is no import cycle, and no module imports a runner script."""
import ast
import re

from conftest import ROOT

# Layer order, bottom first (DESIGN.md "Layers"). A module may import modules of its own or a lower layer.
LAYERS = [
    ("plumbing", ["config", "rope", "distributed", "results_io", "variants", "mqar", "plateau", "work_sizes"]),
    ("reference", ["sparse_attention"]),
    ("fast paths", ["kernels", "triton_kernels", "mqa_kernels", "triton_mqa"]),
    ("backends", ["backends"]),
    ("variants", ["quantization_utils", "adaptive_selection", "sparsity_control", "efficient_patterns",
                  "optimized_indexers"]),
    ("models", ["models", "adaptive_models", "hf_interop", "retrofit"]),
    ("decoding", ["decode"]),
    ("data and training", ["token_files", "data", "train"]),
    ("experiment skeleton", ["experiment"]),
    ("runners", ["ablations", "hf_warmup", "plots", "reports", "run_experiment", "run_comprehensive_ablations", "benchmark",
                 "sample", "visualize_attention", "long_context", "adaptive_sparsity", "gpu_check",
                 "retrofit_experiment"]),
]
LAYER_OF = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}


def project_modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(ROOT.glob("*.py"))}


def imported_project_modules(tree: ast.Module, project: set[str]) -> set[str]:
    """Every project module named by an import anywhere in the file (module level or inside functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & project


def is_script(tree: ast.Module) -> bool:
    """Has an `if __name__ == "__main__":` block."""
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def test_layer_order_is_respected_and_acyclic():
    print("\ndeclared layer order (bottom first):")
    for level, (name, modules) in enumerate(LAYERS, 1):
        print(f"  {level}. {name}: {', '.join(modules)}")
    trees = project_modules()
    graph = {name: imported_project_modules(tree, set(trees)) - {name} for name, tree in trees.items()}
    undeclared = sorted(set(trees) - set(LAYER_OF))
    assert not undeclared, f"modules missing from LAYERS (place them in a layer): {undeclared}"
    upward = [f"{m} (layer {LAYER_OF[m] + 1}) imports {d} (layer {LAYER_OF[d] + 1})"
              for m, deps in graph.items() for d in sorted(deps) if LAYER_OF[d] > LAYER_OF[m]]
    assert not upward, "upward imports:\n" + "\n".join(upward)
    scripts = {name for name, tree in trees.items() if is_script(tree)}
    into_scripts = [f"{m} imports the script {d}" for m, deps in graph.items() for d in sorted(deps & scripts)]
    assert not into_scripts, "\n".join(into_scripts)
    assert not find_cycle(graph), f"import cycle: {' -> '.join(find_cycle(graph))}"


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


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The detectors themselves: a planted cycle and a planted upward import are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    import models\n")
    assert imported_project_modules(tree, {"models"}) == {"models"}  # a function-level import counts
    assert LAYER_OF["models"] > LAYER_OF["sparse_attention"]


def test_readme_layout_and_packaging_name_every_module():
    """The README's layout list and pyproject's py-modules name every module of LAYERS (and only those)."""
    declared = {m for _, modules in LAYERS for m in modules} & set(project_modules())
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = sorted(m for m in declared if f"`{m}.py`" not in layout)
    assert not missing, f"README ## Layout does not name: {missing}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(\w+)"', pyproject[pyproject.index("py-modules"):pyproject.index("]", pyproject.index("py-modules"))]))
    assert listed == declared, f"pyproject py-modules differs: missing {sorted(declared - listed)}, extra {sorted(listed - declared)}"


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
SKELETON_OWNERS = {"check_stale(": {"results_io", "experiment"}, "checkpointed(": {"train", "experiment"},
                   "discard_checkpoints(": {"train", "experiment"}, "holm(": {"results_io"},
                   "paired_t_pvalue(": {"results_io"},
                   '"summary.json"': {"experiment", "gpu_check"},  # gpu_check reads a run's summary back
                   "* 1000 +": set()}  # stream offsets: data.stream_seed and its named STREAM_* constants


def skeleton_copies(sources: dict[str, str]) -> list[str]:
    """'module: pattern' for every skeleton piece found outside the modules that own it."""
    return [f"{module}: {pattern}" for pattern, owners in SKELETON_OWNERS.items()
            for module, text in sources.items() if pattern in text and module not in owners]


def test_the_experiment_skeleton_exists_once():
    sources = {path.stem: path.read_text() for path in sorted(ROOT.glob("*.py"))}
    assert not skeleton_copies(sources), "skeleton pieces re-implemented:\n" + "\n".join(skeleton_copies(sources))
    planted = {"long_context": 'atomic_write_json(out / "summary.json", summary)\nseed * 1000 + 2'}
    assert skeleton_copies(planted) == ['long_context: "summary.json"', "long_context: * 1000 +"]
