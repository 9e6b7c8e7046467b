"""hublab's device runtime: configs, board profiles, experts on llama.cpp, routing and synthesis.

Nothing here imports torch: this is what runs on the Pi.
"""
