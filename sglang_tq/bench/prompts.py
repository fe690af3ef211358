"""The prompt sets of the accuracy tools, and their chat-template tokenization.

``PROMPTS``: 20 chat requests (math word problems, code, explanations, writing), the
prompts of ``python -m sglang_tq.bench fidelity`` and ``fidelity-ref`` and the questions of
``radix``. ``LONG_PROMPTS``: 20 requests for long answers (programs with tests and
explanations, ten problems at once, long articles), fidelity's ``--long`` set, so that most
of 1024 generated positions lie inside the assistant's turn. `build_prompts` renders them
with the model's chat template (ChatML where it has none) into token ids, which the tools
send as ``input_ids``: the text each model sees is fixed here, not by a server's tokenizer.
"""

from __future__ import annotations

PROMPTS = [
    # math word problems
    "A bakery sells muffins for $3 each and cookies for $1.50 each. Maria buys 4 muffins and "
    "6 cookies. How much does she spend? Explain step by step.",
    "A train leaves at 2:15 pm and travels 180 km at an average speed of 60 km/h. At what time "
    "does it arrive? Show your reasoning.",
    "If 3 workers can build a wall in 12 days, how many days would 4 workers need at the same "
    "rate? Explain your answer.",
    "Tom has twice as many marbles as Sara. Together they have 36 marbles. How many marbles "
    "does each of them have? Solve it step by step.",
    "A rectangle has a perimeter of 40 cm and a length of 12 cm. What is its area? Show the steps.",
    # code
    "Write a Python function that checks whether a string is a palindrome, ignoring case and "
    "punctuation. Include a short docstring.",
    "Write a Python function that returns the n-th Fibonacci number iteratively, and explain "
    "its time complexity.",
    "Write a SQL query that returns the five customers with the highest total order amount, "
    "given tables customers(id, name) and orders(id, customer_id, amount).",
    "Write a JavaScript function that removes duplicate values from an array while keeping "
    "the original order.",
    "Explain what this Python code does and suggest an improvement:\n\nresult = []\n"
    "for i in range(len(items)):\n    if items[i] % 2 == 0:\n        result.append(items[i] * items[i])",
    "Write a bash command that counts the lines of all .py files in a directory tree, and "
    "explain each part of it.",
    # explanations
    "Explain how photosynthesis works to a ten-year-old.",
    "What is the difference between a virus and a bacterium? Give three key points.",
    "Explain why the sky is blue.",
    "Describe how a hash table works and when its lookups can become slow.",
    "What causes the seasons on Earth?",
    "Compare TCP and UDP and give an example use case for each.",
    # writing / summarising
    "Summarize the main causes of the French Revolution in a short paragraph.",
    "Give me five tips for writing clear technical documentation.",
    "Write a short story of about 150 words about a robot who learns to paint.",
]

# --long: requests whose full answers run past 1024 tokens, so that most generated
# positions are inside the assistant's turn rather than after its end-of-turn token
LONG_PROMPTS = [
    # code, with tests and explanations
    "Write a complete, well-commented Python module for a command-line to-do list manager "
    "backed by SQLite: argument parsing, add/list/complete/delete commands, input validation "
    "and error handling. Then write a full pytest test suite for it, and finally walk through "
    "every function explaining the design decisions.",
    "Implement a red-black tree in C++ with insert, delete, search and in-order iteration, "
    "with comments on every rotation and recoloring case, and a main() that tests it "
    "thoroughly. After the code, explain each of the insertion and deletion cases in detail.",
    "Write a comprehensive guide to sorting algorithms: for bubble sort, insertion sort, "
    "selection sort, merge sort, quicksort, heapsort, counting sort and radix sort, explain "
    "how it works, give a Python implementation, analyse its time and space complexity, and "
    "trace it by hand on the list [5, 2, 9, 1, 7, 3].",
    "Build a REST API for a small blog (users, posts, comments) with FastAPI and SQLAlchemy. "
    "Give the full code for the models, schemas, routes and authentication, then explain "
    "each part step by step and show example requests and responses for every endpoint.",
    "Implement an LRU cache in Python, Java, Go and C++. For each language give complete, "
    "commented code and unit tests, then compare the four implementations in detail.",
    "Write a complete implementation of Conway's Game of Life in Python with a text-based "
    "display, a pattern loader and unit tests. Then discuss at length how to make it faster, "
    "with code for each optimisation.",
    "Design a relational database for a public library: give the CREATE TABLE statements with "
    "keys, constraints and indexes, INSERT statements with sample data for every table, and "
    "fifteen example SQL queries of increasing difficulty, each followed by an explanation.",
    "Explain how a compiler works, stage by stage (lexing, parsing, semantic analysis, "
    "intermediate representation, optimisation, code generation), with a worked example of "
    "each stage on the statement x = (a + b) * c - 4. Then write a Python tokenizer and a "
    "recursive-descent parser for arithmetic expressions, with tests.",
    "Implement a small neural network from scratch in NumPy: derive the forward pass and "
    "backpropagation equations step by step, write the full training code for the XOR "
    "problem, and explain every line and every hyperparameter.",
    "Write the complete README documentation for a hypothetical open-source Python library "
    "that parses and validates CSV files: installation, quick start, ten usage examples with "
    "code, an API reference for every class and function, an FAQ and a contribution guide.",
    "Write a multithreaded web crawler in Python with a worker pool, rate limiting, robots.txt "
    "handling and retries, with full code and tests, then explain the concurrency design and "
    "every possible race condition in detail.",
    "Write a bash script that backs up a set of directories with rotation, compression, "
    "logging and e-mail alerts, with a comment on every line. Then explain each part of the "
    "script at length and describe how to test it.",
    # mathematics, many problems at once
    "Solve the following ten problems one by one, showing every step of your reasoning in "
    "full for each: (1) the sum of the first 100 odd numbers; (2) the number of ways to seat "
    "6 people at a round table; (3) the area of a triangle with sides 13, 14 and 15; (4) the "
    "roots of x^2 - 7x + 10; (5) compound interest on $1000 at 5% for 10 years; (6) the "
    "probability of two sixes in three dice rolls; (7) the 20th Fibonacci number; (8) the "
    "least common multiple of 12, 18 and 30; (9) the volume of a sphere of radius 7; (10) the "
    "derivative of x^3 * sin(x).",
    "Write a detailed, self-contained introduction to linear algebra for programmers: vectors, "
    "matrices, matrix multiplication, determinants, inverses, eigenvalues and eigenvectors, "
    "each with a worked numerical example computed by hand and the same computation in NumPy.",
    # explanations
    "Explain in a long, thorough article how the internet works, from typing a URL into a "
    "browser to the page being displayed: DNS, TCP, TLS, HTTP, routing, caching and "
    "rendering, with concrete examples at every step.",
    "Write a detailed guide to the history of computing, from the abacus and Babbage's "
    "engines through vacuum tubes, transistors, integrated circuits and personal computers to "
    "today's GPUs, with a section on each era and the people involved.",
    "Explain how operating systems manage memory, in depth: virtual memory, paging, page "
    "tables, TLBs, page faults, swapping, memory-mapped files and allocators, with a worked "
    "example for each and C code where it helps.",
    # writing
    "Write a long short story, at least 1500 words, in several chapters, about a robot who "
    "learns to paint and opens an art school, with dialogue and detailed descriptions.",
    "Write a detailed week-long lesson plan for an introductory programming course in Python: "
    "for each day the goals, a lecture outline, code examples, exercises with full solutions "
    "and a short quiz with answers.",
    "Write a comprehensive code review of a typical beginner's Python script that reads a "
    "file of numbers, computes statistics and prints a report: first write the script with "
    "its usual mistakes, then review it line by line, and finally give the fully improved "
    "version with tests.",
]


def build_prompts(model_path: str, n: int, texts: list[str] | None = None) -> list[list[int]]:
    """The first ``n`` of ``texts`` (default PROMPTS) as chat-template token ids."""
    from transformers import AutoTokenizer

    texts = PROMPTS if texts is None else texts
    if n > len(texts):
        raise SystemExit(f"--num-prompts {n}: only {len(texts)} prompts are defined; ask for fewer")
    tok = AutoTokenizer.from_pretrained(model_path)
    out = []
    for text in texts[:n]:
        msgs = [{"role": "user", "content": text}]
        if getattr(tok, "chat_template", None):
            s = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:  # ChatML, what both GGUF models use
            s = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        out.append(list(tok(s, add_special_tokens=False).input_ids))
    return out
