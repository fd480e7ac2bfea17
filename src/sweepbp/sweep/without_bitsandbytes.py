"""Imported first by a fork server whose jobs are predictions that never use bitsandbytes: keeps it out of them.

peft (and transformers) import bitsandbytes whenever it is installed, which costs every fork server 1.0-1.6 s of
imports on a 2-core machine (docs/performance.md), most of it torch's compiler stack, which bitsandbytes imports
to define its CPU kernels. A None in `sys.modules` makes `importlib.util.find_spec` say it is not installed, which
is how both libraries ask; nothing else changes for a prediction that uses neither quantised weights nor an
8-bit optimizer. A job that does, and any measured job (its host memory counts what the libraries import, as in
a run of them), is forked from a server without this module (sweep/worker.py starts one).
"""

import sys

sys.modules.setdefault("bitsandbytes", None)
