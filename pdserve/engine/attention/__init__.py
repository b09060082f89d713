"""Attention backends behind one interface (see ``backend.py``); ``select_backend`` picks one."""
