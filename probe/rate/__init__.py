"""Human preference studies: `probe rate` draws pairs from a run, serves them to raters and stores their votes."""
