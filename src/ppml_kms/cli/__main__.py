from __future__ import annotations

from . import console_main

console_main()
