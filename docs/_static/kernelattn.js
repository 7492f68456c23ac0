// Page titles that are long dotted API names break after a dot rather than inside a word.
document.addEventListener("DOMContentLoaded", () => {
  for (const h of document.querySelectorAll(".bd-article h1")) {
    for (const node of [...h.childNodes]) {
      if (node.nodeType !== Node.TEXT_NODE || !node.data.includes(".")) continue;
      const parts = node.data.split(/(?<=\.)/), frag = document.createDocumentFragment();
      parts.forEach((part, i) => { if (i) frag.append(document.createElement("wbr")); frag.append(part); });
      h.replaceChild(frag, node);
    }
  }
});
