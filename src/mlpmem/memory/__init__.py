"""mlpmem.memory"""
