"""Code every specdec service uses: config, model loading, sampling, proposers, store, metrics."""
