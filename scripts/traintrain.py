"""Web-UI entry point (AUTOMATIC1111 1.10, Forge): registers the TrainTrain tab. Thin on purpose:
the tab is trainer.ui over trainer.host.webui.WebUIHost."""
import os
import sys

from modules import script_callbacks

EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_trainer():
    if EXT_ROOT not in sys.path:
        sys.path.insert(0, EXT_ROOT)
    import trainer

    where = os.path.dirname(os.path.abspath(trainer.__file__))
    if os.path.dirname(where) != EXT_ROOT:
        raise ImportError(f"TrainTrain: another package named 'trainer' was imported first ({where}); "
                          f"TrainTrain needs its own ({EXT_ROOT}/trainer)")


def on_ui_tabs():
    _import_trainer()
    from trainer.host.webui import WebUIHost
    from trainer.ui import create_ui

    ui = create_ui(WebUIHost(EXT_ROOT))
    return [(ui.blocks, "TrainTrain", "traintrain")]


script_callbacks.on_ui_tabs(on_ui_tabs)
