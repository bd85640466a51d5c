"""mlpmem.evaluate"""
