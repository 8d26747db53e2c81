"""Class-conditional BigGAN image synthesis with the chosen norm-act layer in G (as a class-conditional norm-act)."""
