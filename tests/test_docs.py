"""The documentation tells the truth about the repository: every test that docs/fidelity.md cites exists,
and no file of the project points readers to a file that is not in it."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CITED_TEST = re.compile(r"(test_\w+\.py)::(test_\w+)")
MARKDOWN_REFERENCE = re.compile(r"[\w./-]*[\w-]+\.md\b")  # A document a reader is sent to.


def _test_functions(path: pathlib.Path) -> set[str]:
  tree = ast.parse(path.read_text())
  return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_test_cited_in_fidelity_md_exists():
  text = (ROOT / "docs" / "fidelity.md").read_text()
  cited = CITED_TEST.findall(text)
  assert len(cited) > 40, "docs/fidelity.md should cite the tests that prove each behaviour"
  missing = [
    f"{file}::{name}"
    for file, name in cited
    if not (ROOT / "tests" / file).exists() or name not in _test_functions(ROOT / "tests" / file)
  ]
  assert not missing, f"docs/fidelity.md cites tests that do not exist: {missing}"


def _project_files():
  for pattern in ("*.md", "*.py", "*.toml", "Makefile", "*.sh"):
    for path in ROOT.rglob(pattern):
      parts = path.relative_to(ROOT).parts
      if parts[0] in (".venv", ".git", "build", "demo_workdir", "workdirs") or "egg-info" in parts[0]:
        continue
      if path.name == "test_docs.py":
        continue
      yield path


def test_no_file_refers_to_files_outside_the_repository():
  documents = {str(path.relative_to(ROOT)) for path in ROOT.rglob("*.md") if ".venv" not in path.parts}
  offenders = [
    f"{path.relative_to(ROOT)}:{n}: {reference}"
    for path in _project_files()
    for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1)
    for reference in MARKDOWN_REFERENCE.findall(line)
    if not any(document.endswith(reference.lstrip("./")) for document in documents)
  ]
  assert not offenders, f"references to documents that are not in the repository: {offenders}"


def _undocumented(path: pathlib.Path) -> list[str]:
  """Public functions and methods of `path` without Args (when they take arguments) or Returns (when they
  return a value). A method that overrides one of a base class (ours, documented there, or a library's
  interface such as clu's MetricWriter), Flax's `setup` and a config file's `get_config` are exempt."""
  tree = ast.parse(path.read_text())
  classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

  def inherited(cls: ast.ClassDef, name: str) -> bool:
    for base in cls.bases:
      base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
      if base_name not in classes:
        if base_name not in ("Module", "Exception", "ValueError", "RuntimeError", "object"):
          return True  # A library's interface: documented by the library.
        continue
      parent = classes[base_name]
      if any(isinstance(n, ast.FunctionDef) and n.name == name for n in parent.body) or inherited(
        parent, name
      ):
        return True
    return False

  missing = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef):
      functions = [(node, None)]
    elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      functions = [(n, node) for n in node.body if isinstance(n, ast.FunctionDef)]
    else:
      continue
    for function, cls in functions:
      if function.name.startswith("_") or function.name == "setup":
        continue
      if cls is not None and inherited(cls, function.name):
        continue
      if path.parent.name == "configs" and function.name == "get_config":
        continue  # ml_collections' config-file interface; the file's docstring gives its arguments.
      args = [a.arg for a in function.args.args + function.args.kwonlyargs if a.arg not in ("self", "cls")]
      doc = ast.get_docstring(function) or ""
      returns = (
        function.returns is not None
        and not (isinstance(function.returns, ast.Constant) and function.returns.value is None)
        and ast.unparse(function.returns) not in ("NoReturn", "typing.NoReturn")
      )
      if (args and "Args:" not in doc) or (returns and "Returns:" not in doc and "Yields:" not in doc):
        missing.append(f"{path.relative_to(ROOT)}:{function.lineno} {function.name}")
  return missing


def test_public_functions_of_the_package_document_args_and_returns():
  missing = [m for path in sorted((ROOT / "esvit_jax").rglob("*.py")) for m in _undocumented(path)]
  assert not missing, f"public functions without Args/Returns sections: {missing}"
