#!/usr/bin/env python3
"""Writes chat messages for `distillery continuations --chat`: requests of the kinds users send
an assistant (explain, list, write, compare, advise), each about one of many everyday and
school topics, in a fixed shuffled order. A speculative draft distilled on the teacher's
answers to them learns what the teacher writes for chat prompts.

    python3 scripts/chat_prompts.py > datasets/chat-prompts.txt
"""
import random

REQUESTS = [
    "Explain {} in simple terms.",
    "What are the main ideas behind {}?",
    "Give me three tips about {}.",
    "Write a short poem about {}.",
    "Write a short story that involves {}.",
    "What are the advantages and disadvantages of {}?",
    "How would you teach a child about {}?",
    "Summarize the history of {} in a few sentences.",
    "What are common mistakes people make with {}?",
    "Can you list five facts about {}?",
    "Why is {} important?",
    "Describe {} to someone who has never heard of it.",
    "What questions should I ask to learn more about {}?",
    "Write a friendly email to a colleague about {}.",
    "How has {} changed over the last hundred years?",
    "What is the best way to get started with {}?",
    "Compare {} with something similar and explain the difference.",
    "Write a short dialogue between two friends discussing {}.",
    "What would happen if {} disappeared tomorrow?",
    "Give me a step-by-step plan for learning about {}.",
]

TOPICS = [
    "photosynthesis", "the water cycle", "gravity", "volcanoes", "the solar system",
    "climate change", "recycling", "healthy sleep", "drinking enough water", "regular exercise",
    "learning a new language", "playing the guitar", "cooking pasta", "baking bread",
    "growing tomatoes", "keeping a houseplant alive", "saving money", "making a budget",
    "job interviews", "public speaking", "time management", "writing a resume",
    "the Roman Empire", "the printing press", "the invention of the telephone",
    "the French Revolution", "ancient Egypt", "the Moon landing", "electric cars",
    "solar panels", "computer programming", "the internet", "artificial intelligence",
    "smartphones", "password security", "social media", "reading books", "chess",
    "football", "swimming", "meditation", "friendship", "teamwork", "volunteering",
    "traveling by train", "visiting a museum", "dogs as pets", "cats as pets", "honey bees",
    "the ocean", "rain forests", "deserts", "mountains", "snow", "earthquakes",
    "the human heart", "vaccines", "vitamins", "the immune system", "the brain",
]


def main():
    messages = [request.format(topic) for topic in TOPICS for request in REQUESTS]
    random.Random(7).shuffle(messages)
    for message in messages:
        print(message)


if __name__ == "__main__":
    main()
