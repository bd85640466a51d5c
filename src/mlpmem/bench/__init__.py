"""mlpmem.bench"""
