"""mlpmem.data"""
