"""Scale-out: layout maps, meshes, and memory planning."""
