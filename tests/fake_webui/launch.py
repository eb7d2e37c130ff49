"""launch.py of the Web-UI, as install.py sees it: is_installed / run_pip."""
import importlib.metadata
import importlib.util

installed = None  # fake: a set of names that count as installed (None: ask importlib)
pip_calls = []  # fake: the argument strings run_pip received


def is_installed(package):
    if installed is not None:
        return package.lower() in {p.lower() for p in installed}
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    pip_calls.append(command)
    return ""
