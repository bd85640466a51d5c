"""mlpmem.lm"""
