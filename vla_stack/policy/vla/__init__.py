"""pi0-style vision-language-action policy: configuration_vla (config), modeling_vla (network), normalize,
dataset, train, checkpoint, runner (chunk execution), bench, commands (CLI)."""

import os

# On a shared 2-core machine OpenMP's default busy-waiting makes every small op wait for a descheduled
# thread (a 20 ms chunk took over 1 s). Only effective if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
