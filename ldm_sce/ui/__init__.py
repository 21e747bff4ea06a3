"""The web UI (`tools/webui.py`; `pip install -e ".[ui]"`): `workspace.py` holds what it does without
gradio (folders, the device queue, generation and training jobs), `app.py` the page."""
