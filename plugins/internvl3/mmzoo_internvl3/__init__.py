"""InternVL3 for mmzoo (the ``internvl3`` plugin of the ``mmzoo`` entry-point group)."""
