"""``python -m broker_bridge``: the same CLI as ``broker-bridge``."""

from __future__ import annotations

import sys

from broker_bridge.cli import main

sys.exit(main())
