"""Pure model definitions annotated with logical axes; they know nothing of meshes or training."""
