from histo_dist.cli import entry

entry()
