"""Routing: the router that scores experts, knowledge lookup, and the moe strategies that synthesise answers."""
