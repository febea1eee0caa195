"""What a finished search shows: evaluation figures, bootstrap intervals, explanations
(Grad-CAM, occlusion, t-SNE, the shortcut check), search figures and the HTML report."""
