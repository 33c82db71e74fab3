"""Circuit discovery on edges: the graph, edge patching, EAP, EAP-IG and ACDC, and circuit evaluation.

    graph = Graph.from_model(model)                      # writers, readers, edges
    scores = discover(model, batch, method="eap-ig")     # one signature for every method
    circuit = scores.circuit(edges=200)                  # top edges, pruned
    evaluate(model, batch, circuit)["faithfulness"]
"""

from mechscope.discovery.discover import METHODS, discover
from mechscope.discovery.edges import EdgePatcher
from mechscope.discovery.evaluate import Evaluator, evaluate
from mechscope.discovery.graph import Graph
from mechscope.discovery.scores import Circuit, EdgeScores

__all__ = ["METHODS", "Circuit", "EdgePatcher", "EdgeScores", "Evaluator", "Graph", "discover", "evaluate"]
