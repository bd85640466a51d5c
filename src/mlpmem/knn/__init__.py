"""mlpmem.knn"""
