"""Pins every Ray process of a test cluster to 127.0.0.1 (on PYTHONPATH only for those processes).

Ray turns ``127.0.0.1`` into the machine's routable address (found by routing towards a public IP) so that
other hosts can reach the node; test clusters must target loopback only, so that lookup answers 127.0.0.1.
"""

import importlib.abc
import importlib.util
import sys

_MODULE = "ray._common.network_utils"


def _loopback(*_args, **_kwargs) -> str:
    return "127.0.0.1"


class _PinLoopback(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            # Patched before any Ray module imports the name, so every caller sees the loopback answer.
            module.node_ip_address_from_perspective = _loopback

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PinLoopback())
