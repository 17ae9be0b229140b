from picotron_jax.tutorials.notebook import main

main()
