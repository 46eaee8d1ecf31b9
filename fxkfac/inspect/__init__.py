"""Views of a compiled module: networkx graph (GraphML/DOT) and rich reports."""
