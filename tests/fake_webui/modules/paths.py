"""modules/paths.py (only the folders extensions read)."""
import os

script_path = os.getcwd()
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
