"""Serving-side code shared by the builder's checks and the `t5_generate` model.

Plain torch and the standard library only: no `triton_python_backend_utils`, no transformers.
The builder copies this package into the model repository next to `t5_generate`'s model.py.
"""
