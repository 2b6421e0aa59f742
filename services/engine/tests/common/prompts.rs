//! Twenty varied chat prompts for the losslessness tests.

pub const PROMPTS: [&str; 20] = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a Python function that checks whether a number is prime.",
    "What are three tips for staying productive while working from home?",
    "Translate 'Good morning, how are you?' into Spanish and French.",
    "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "List five fruits that are high in vitamin C.",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a linked list in C?",
    "Give me a recipe for a simple tomato pasta.",
    "Why is the sky blue?",
    "Describe the water cycle step by step.",
    "What is 17 multiplied by 23?",
    "Write a friendly email inviting a colleague to lunch.",
    "What causes the seasons on Earth?",
    "Name the planets of the solar system in order from the Sun.",
    "Tell me a joke about computers.",
];
